"""The cluster scheduler on etcd (issue 15): the etcd client, node registration, placement and the front."""
