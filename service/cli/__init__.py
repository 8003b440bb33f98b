"""The command lines, one module per role. `microtasks` (main.py) is the client: account.py (account
holder: wallet, register, balance, tokens, payouts, withdrawals, deposits), developer.py (catalog, call,
QA runs), asker.py, expert.py, lists.py (list owner and member), surveyor.py, crowd.py (runner and buyer);
output.py is their one output and exit-code contract. operator.py is `python -m service` (the operator's)."""
