"""Bitcoin rails: addresses derived from the operator's xpub, chain backends, deposits, withdrawals."""
