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


def plotted_axes(runs, out, **options) -> list[dict]:
    """Draw llama.plot's figure of `runs` into `out` and return what each panel shows: title, y-label, the
    colour of each line by its label, and any x tick that is not a whole step."""
    import matplotlib.pyplot as plt

    from llama.plot import plot_runs

    drawn = []
    real_savefig = plt.Figure.savefig

    def savefig(figure, path, *args, **kwargs):
        drawn.extend({"title": ax.get_title(), "ylabel": ax.get_ylabel(),
                      "colors": {line.get_label(): line.get_color() for line in ax.get_lines()},
                      "fractional_ticks": [tick for tick in ax.get_xticks() if tick != int(tick)]}
                     for ax in figure.axes)
        return real_savefig(figure, path, *args, **kwargs)

    plt.Figure.savefig = savefig
    try:
        plot_runs(list(runs), out, **options)
    finally:
        plt.Figure.savefig = real_savefig
    return drawn
