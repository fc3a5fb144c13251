"""The agent's side of containerd: loading complete images into its content store."""
