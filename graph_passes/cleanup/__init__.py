"""graph_passes/cleanup"""
