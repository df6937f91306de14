"""The operator side: the `durable` CLI, the UI, the launcher, import and export."""
