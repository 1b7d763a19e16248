"""Running one user: lease, unseal, connect, reconcile, run the chain, record.

:class:`Runner` puts the parts in order (:mod:`byod.runner.core`); each part is its own
module: the stamp read and reconciled (``reconcile``), the chain of steps and its records
(``chain``), one step on the instance (``step``), the trail a refusal leaves (``trail``).
"""

from byod.runner.core import Runner, TargetOpener

__all__ = ["Runner", "TargetOpener"]
