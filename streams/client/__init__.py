"""What institution systems and tools use to talk to a chain: submit, wait, read status."""
