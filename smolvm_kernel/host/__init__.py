"""What one host keeps: the VM registry, cgroups, network, audit log, policy."""
