"""grafos-fabric: leased fabric memory queues for grafOS-style pipelines."""
