"""Host plumbing: what the VMM tells about and asks of the host it runs on."""
