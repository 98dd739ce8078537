"""The base model: which one (embedded, folder, hub, run), the family registry, LoRA adapters,
where and in which precision it runs, and its loss on a batch."""
