"""The ClientApp: the only change from Flower's SecAgg+ is the mod.

    ClientApp(client_fn=client_fn, mods=[secaggplus_mod])   # Flower's SecAgg+
    ClientApp(client_fn=client_fn, mods=[secagg_mod])       # secagg
"""

from flwr.client import ClientApp

from flower_app.task import client_fn
from peers.flower import secagg_mod

app = ClientApp(client_fn=client_fn, mods=[secagg_mod])
