"""The bookkeeping of a cluster step: requests, schedulers, the cluster and its policies, the step contract. No torch."""
