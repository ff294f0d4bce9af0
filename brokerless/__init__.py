"""brokerless"""
