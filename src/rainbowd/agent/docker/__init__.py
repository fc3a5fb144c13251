"""The agent's side of Docker: loading images into the engine and running cluster ops."""
