"""The machinery every stage shares: the contract, the graph, the runner, the store, keys."""
