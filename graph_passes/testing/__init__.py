"""graph_passes/testing"""
