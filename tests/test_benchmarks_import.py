"""Every benchmark command imports (a refactor of the library must not silently break one), and benchmarks/
holds only its topic folders, each a package with a docstring."""

import importlib
import pkgutil

import pytest

import benchmarks

TOPICS = ("tokenizer", "decoding", "evaluation", "diagnostics")
MODULES = sorted(m.name for m in pkgutil.walk_packages(benchmarks.__path__, prefix="benchmarks.") if not m.ispkg)


def test_benchmarks_are_grouped_by_topic():
    top = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__))
    assert top == sorted(TOPICS)
    for topic in TOPICS:
        assert importlib.import_module(f"benchmarks.{topic}").__doc__, f"benchmarks/{topic}/__init__.py needs a docstring"
    assert {m.split(".")[1] for m in MODULES} == set(TOPICS)


@pytest.mark.parametrize("name", MODULES)
def test_benchmark_module_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name.replace('.', '/')}.py needs an opening docstring saying what it measures"
