"""mesh: run and fine-tune large language models across a swarm of devices."""

__version__ = "0.1.0"
