"""Thin wrappers over ``cryptography``: key agreement, KDF, AEAD, PRG, Shamir, signatures."""
