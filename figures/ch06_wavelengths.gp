# Chapter 06: the wavelength (tokens per full turn) of each rotated pair of a 128-dimensional head, for two
# bases and for Llama 3.1's scaled frequencies, against the 8K context Llama 3 was trained on.
# Data: 06_rotary_position_embedding/wavelengths.dat, "pair base10000 base500000 llama3_scaled".
load 'style.gp'

data = datadir.'/06_rotary_position_embedding/wavelengths.dat'
set title 'RoPE wavelength of each pair (head dimension 128)'
set xlabel 'pair i (dimensions 2i, 2i+1 or i, i+64)'
set ylabel 'wavelength (tokens per turn)'
set logscale y 10
set format y '10^{%L}'
set xrange [0 : 63]
set key top left
set arrow 1 from graph 0, first 8192 to graph 1, first 8192 nohead dashtype 2 linecolor rgb '#7f7f7f'
set label 1 'training context of Llama 3 (8192)' at graph 0.6, first 8192 / 2.6 left textcolor rgb '#4d4d4d' font ',11'
plot data using 1 : 2 with lines linetype 3 title 'base 10,000', \
     data using 1 : 3 with lines linetype 1 title 'base 500,000', \
     data using 1 : 4 with lines linetype 2 title 'base 500,000, llama3-scaled (Llama 3.1)'
