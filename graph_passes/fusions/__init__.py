"""graph_passes/fusions"""
