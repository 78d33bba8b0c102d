# Every target prepares .venv itself (scripts/setup.sh is idempotent).
.PHONY: setup demo test bench

setup:
	@scripts/setup.sh

demo: setup
	.venv/bin/mesh demo

test: setup
	.venv/bin/python -m pytest -q -p no:cacheprovider --durations=15 -rs

bench: setup
	.venv/bin/python bench/inference.py
