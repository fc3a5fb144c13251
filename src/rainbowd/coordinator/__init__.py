"""rbd-coordinator: one per cluster; knows every node and schedules transfers."""
