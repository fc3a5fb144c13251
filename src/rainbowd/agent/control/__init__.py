"""What the agent tells the coordinator besides its main loop: reports that arrive once."""
