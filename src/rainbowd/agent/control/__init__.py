"""What the agent tells the coordinator: its standing (register, heartbeats, long-poll)
and the reports that arrive once."""
