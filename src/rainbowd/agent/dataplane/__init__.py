"""The agent's data plane: chunks served and pulled over SSH, the relay, the pacer, the keys."""
