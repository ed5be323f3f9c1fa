"""fut: estimate how a language model would have turned out had its training batches come in another order."""
import os

# The suite never downloads: a failed hub lookup otherwise retries for ~24 s. Set these to 0 to let an
# `hf_dataset` corpus source fetch from the hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
