"""Bitcoin facts through bitcoinlib: which bitcoinlib network a configured NETWORK is, and address checks."""
from __future__ import annotations

from functools import lru_cache

__all__ = ["BITCOINLIB_NETWORK", "valid_address", "DUST_LIMIT"]

# bitcoinlib names the networks differently; signet shares testnet's address formats
BITCOINLIB_NETWORK = {"mainnet": "bitcoin", "testnet": "testnet", "signet": "testnet", "regtest": "regtest"}
DUST_LIMIT = 546  # sat: below this an output is non-standard for P2PKH (294 for P2WPKH); we use the larger


@lru_cache(maxsize=4096)
def valid_address(address: str, network: str) -> bool:
    """True if `address` parses (checksum included) and belongs to the configured network."""
    from bitcoinlib.keys import Address  # noqa: PLC0415  (bitcoinlib is slow to import; only here)

    if not address or len(address) > 100:
        return False
    try:
        parsed = Address.parse(address)
    except Exception:  # noqa: BLE001 - bitcoinlib raises several types for bad encodings
        return False
    return parsed.network.name == BITCOINLIB_NETWORK[network]
