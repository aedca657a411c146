"""Where models live on disk: blobs, manifests, the catalog and the sources."""
