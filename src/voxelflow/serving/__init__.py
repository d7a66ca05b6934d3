"""The inference service, batch prediction and Kubernetes rendering."""
