"""PBIP (Prototype-Based Image Prompting, CVPR 2025): ClassNet CAMs on bank prototypes + FG/BG matching."""
