"""pipeline/runtime"""
