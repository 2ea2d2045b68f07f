"""Tasks: what a run teaches the base, and how its adapter is used.

`base.Task` is the protocol; `chat` and `classify` implement it; `registry.TASKS` finds one by
name. `kinds` answers, from an adapter's metadata alone, what its task lets it do (for the
loaders the tasks build on). Nothing is imported here, so a building block can use `kinds`
without loading every task. See docs/adding-a-task.md.
"""
