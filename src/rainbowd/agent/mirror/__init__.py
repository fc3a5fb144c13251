"""The registry front door: the OCI distribution read API over what this node holds."""
