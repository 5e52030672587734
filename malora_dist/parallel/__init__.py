"""Parallel layout: process groups, expert-parallel token exchange, tensor-parallel mappings, gradient reduction."""
