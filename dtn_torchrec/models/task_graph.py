"""Dependencies between tasks (TSN inputs, ESMM products): validation and evaluation order."""

from __future__ import annotations

from typing import List, Mapping, Sequence


def dependency_order(
    tasks: Sequence[str], depends_on: Mapping[str, Sequence[str]], what: str
) -> List[str]:
    """Order ``tasks`` so that every task comes after the tasks it depends on.

    Ties keep the configured order. ``what`` names the config key in error messages.

    Raises:
        ValueError: unknown task names, a task depending on itself, or a cycle.
    """
    for task, parents in depends_on.items():
        if task not in tasks:
            raise ValueError(f"{what}: {task!r} is not a task (tasks: {list(tasks)})")
        for parent in parents:
            if parent not in tasks:
                raise ValueError(f"{what}.{task}: {parent!r} is not a task (tasks: {list(tasks)})")
            if parent == task:
                raise ValueError(f"{what}.{task}: a task cannot depend on itself")
    order: List[str] = []
    remaining = list(tasks)
    while remaining:
        ready = [t for t in remaining if all(p in order for p in depends_on.get(t, ()))]
        if not ready:
            raise ValueError(f"{what}: dependency cycle among {remaining}")
        order.append(ready[0])
        remaining.remove(ready[0])
    return order
