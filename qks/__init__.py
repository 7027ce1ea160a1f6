"""qks: open-vocabulary multi-label image classification after Query-Based Knowledge Sharing.

This module stays torch-free: `qks.runtime` and `qks.engines` import it, and deployments that
install only the core (runtime) must never pull torch in.
"""

__version__ = "0.1.0"
