import pytest


@pytest.fixture(scope="session")
def short_fit(tmp_path_factory):
    """``short_fit(name)``: the method's shared short fit (helpers/short_fit.py), run once per session."""
    from helpers.short_fit import run_short_fit  # Lightning, imported at collection, would empty caplog

    done = {}

    def get(name: str):
        if name not in done:
            done[name] = run_short_fit(name, tmp_path_factory.mktemp(f"short_fit_{name}"))
        return done[name]

    return get
