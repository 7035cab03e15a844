"""graph_passes/target"""
