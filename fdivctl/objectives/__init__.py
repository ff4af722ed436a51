"""Training objectives composed from the loss engine and the divergence registry."""
