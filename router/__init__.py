"""ClusterRouter: partition ownership and routing of notifications to gateways."""
