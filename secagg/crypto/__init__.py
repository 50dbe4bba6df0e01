"""Thin wrappers over ``cryptography``: key agreement, KDF, AEAD, PRG, Shamir, signatures."""

from secagg.crypto.aead import AssociatedData, open_sealed, seal
from secagg.crypto.kdf import PROTOCOL_ID, derive_key
from secagg.crypto.keys import KeyPair, RandomBytes, agree, generate_keypair, validate_public_key
from secagg.crypto.prg import MaskGenerator
from secagg.crypto.shamir import PRIME, Share, reconstruct, reconstruct_checked, split
from secagg.crypto.signing import SigningKey, generate_signing_key, sign, verify

__all__ = [
    "PRIME",
    "PROTOCOL_ID",
    "AssociatedData",
    "KeyPair",
    "MaskGenerator",
    "RandomBytes",
    "Share",
    "SigningKey",
    "agree",
    "derive_key",
    "generate_keypair",
    "generate_signing_key",
    "open_sealed",
    "reconstruct",
    "reconstruct_checked",
    "seal",
    "sign",
    "split",
    "validate_public_key",
    "verify",
]
