"""Shared test fixtures: the Llama article's own model, an independent reference kept outside the project."""
import sys
from pathlib import Path

import pytest

REFERENCE = Path(__file__).resolve().parents[2] / "shared" / "reference"


@pytest.fixture(scope="session")
def article_llama():
    """shared/reference/article_llama.py as a module; the test skips with a reason where it is absent."""
    if not (REFERENCE / "article_llama.py").is_file():
        pytest.skip(f"{REFERENCE / 'article_llama.py'} is absent: the article's model is a reference kept "
                    "beside the project, not in it")
    sys.path.insert(0, str(REFERENCE))
    import article_llama

    return article_llama
