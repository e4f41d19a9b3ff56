"""Multi-agent, end-to-end, netns and packaging scenarios."""
