# The house style of every figure in the book: one terminal, one font, one palette.
# A figure script is run from figures/ as
#   gnuplot -e "datadir='<build>/generated'" -e "outfile='<build>/generated/figures/NAME.svg'" NAME.gp
# and starts with `load 'style.gp'`; it then only says what to plot.

set terminal svg enhanced size 720,440 font 'sans-serif,13' background rgb 'white'
set output outfile
set encoding utf8

# Axes: a light frame on the left and bottom, ticks outside, a faint grid behind the data.
set border 3 linecolor rgb '#4d4d4d'
set tics nomirror out scale 0.6 textcolor rgb '#333333'
set grid back linecolor rgb '#e5e5e5' linewidth 1 dashtype solid
set title font 'sans-serif,15'
set key noautotitle opaque box linecolor rgb '#cccccc' reverse Left samplen 2.5 spacing 1.2

# Lines and points: the Okabe-Ito colours, which stay distinct for colour-blind readers and in grey.
set linetype 1 linecolor rgb '#0072b2' linewidth 2.2 pointtype 7 pointsize 0.7
set linetype 2 linecolor rgb '#d55e00' linewidth 2.2 pointtype 5 pointsize 0.7
set linetype 3 linecolor rgb '#009e73' linewidth 2.2 pointtype 9 pointsize 0.8
set linetype 4 linecolor rgb '#cc79a7' linewidth 2.2 pointtype 13 pointsize 0.8
set linetype 5 linecolor rgb '#e69f00' linewidth 2.2 pointtype 11 pointsize 0.8
set linetype 6 linecolor rgb '#56b4e9' linewidth 2.2 pointtype 15 pointsize 0.8
set linetype cycle 6

# Heatmaps: one sequential palette from white to dark blue, so that zero reads as "nothing".
set palette defined (0 '#ffffff', 0.15 '#deebf7', 0.4 '#9ecae1', 0.7 '#3182bd', 1 '#08306b')
# Cells that a mask removes (plotted as NaN) show this colour instead of a palette colour.
masked_colour = '#d9d9d9'

# Byte and token labels on base-2 axes: bytes(2**20) = "1 MiB", tokens(2**17) = "128K".
bytes(x) = x >= 2**40 ? sprintf('%g TiB', x / 2.0**40) : x >= 2**30 ? sprintf('%g GiB', x / 2.0**30) : \
           x >= 2**20 ? sprintf('%g MiB', x / 2.0**20) : x >= 2**10 ? sprintf('%g KiB', x / 2.0**10) : \
           sprintf('%g B', x)
tokens(x) = x >= 2**20 ? sprintf('%gM', x / 2.0**20) : x >= 2**10 ? sprintf('%gK', x / 2.0**10) : sprintf('%g', x)
