"""Read and write the on-disk formats only: ATB .bin tensors, ATB dump layout and topology JSON, torch dump layout
and model_tree.json. Nothing here knows about pytest, pairing or metrics."""
