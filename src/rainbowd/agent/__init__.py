"""rbd-agent: runs on every host; moves layers to and from peers over SSH."""
