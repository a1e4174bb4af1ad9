"""Ray Data actor pools over datasets: teacher embeddings, (with the deployment issue) reconstructions."""
