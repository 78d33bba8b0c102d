"""mesh: run and fine-tune large language models across a swarm of devices."""

__version__ = "0.1.0"

__all__ = ["DistributedModelForCausalLM", "__version__"]


def __getattr__(name: str):
    # Imported on first use: `import mesh` (and `mesh --help`) stays fast.
    if name == "DistributedModelForCausalLM":
        from .api import DistributedModelForCausalLM

        return DistributedModelForCausalLM
    raise AttributeError(name)
