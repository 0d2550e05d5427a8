"""Where the repository's files are, for tests that read configs or launch subprocesses."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TESTS = REPO / "tests"
CONFIGS = REPO / "configs"
FIXTURES = TESTS / "fixtures"
#: real data for benchmarks and the tests that skip without it (../shared/data/README.md)
SHARED_DATA = REPO.parent / "shared" / "data"
