"""The `rbd` command: the admin CLI over the coordinator's admin API."""
