"""One module (service/keys.py) owns the hash tag, Redis key names and account names: sharding accounts
(issue 16) then changes one place. Nothing else spells the tag or an account-name prefix itself."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
SPELLINGS = re.compile(r"""["']\{["'] \+ \w*prefix|f["']\{\{|["']\{sim\}|["'](u|escrow|sys|onchain):[a-z]*["'{]""")


def test_only_keys_module_spells_tags_and_account_names() -> None:
    offenders = []
    for folder in ("service", "endpoints", "sim", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name in ("keys.py", "test_keys.py"):
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if SPELLINGS.search(line):
                    offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
