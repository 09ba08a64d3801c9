"""Attribution graphs: the ``Graph`` type, neuron tracing, pruning and export."""
